import sys

from scalellm.serving.cli import main

sys.exit(main())
