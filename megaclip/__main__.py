import sys

from megaclip.cli.main import main

sys.exit(main())
