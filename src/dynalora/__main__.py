import sys

from dynalora.cli import main

sys.exit(main())
