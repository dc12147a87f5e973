import sys

from caffe_prune.cli import main

sys.exit(main())
