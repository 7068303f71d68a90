"""``python -m diffbackbone.mmseg train CONFIG ...`` / ``python -m diffbackbone.mmseg test CONFIG CHECKPOINT ...``."""
from .tools import main

if __name__ == '__main__':
    main()
