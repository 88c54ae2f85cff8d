import os
import sys

# tests/reference.py (the independent autograd reference) is imported as a plain module.
sys.path.insert(0, os.path.dirname(__file__))
