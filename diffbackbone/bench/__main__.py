"""`python -m diffbackbone.bench`: our extractor against a plain-diffusers reference (`bench/speed.py`)."""
from .speed import main

main()
