import os
import sys

# the test-only ring driver lives next to the tests
sys.path.insert(0, os.path.dirname(__file__))
