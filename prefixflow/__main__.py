import sys

from prefixflow.entrypoints.cli import main

sys.exit(main())
