import sys

from . import main

main()
sys.exit(0)
