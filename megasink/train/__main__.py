import sys

from megasink.train.main import main

sys.exit(main())
