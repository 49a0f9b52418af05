import os
import sys

# The bench scripts import their shared helpers as ``common``, as when run as scripts.
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "bench"))
