import sys

from modelopt_streaming.cli import main

sys.exit(main())
