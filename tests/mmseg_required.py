"""Imported first by the mmseg test files: a missing mmseg extra is an install error, not a reason to skip."""
try:
    import mmseg  # noqa: F401
except ImportError as e:
    raise ImportError('These tests need the mmseg extra: pip install -e ".[mmseg,test]" && '
                      'bash tools/build_mmcv.sh python') from e
