"""`python -m diffbackbone.bench`: our extractor against a plain-diffusers reference (see `diffbackbone.bench.speed`)."""
from .speed import main

main()
