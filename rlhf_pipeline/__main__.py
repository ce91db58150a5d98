"""`python -m rlhf_pipeline`, which is what `accelerate launch -m rlhf_pipeline ...` runs on every rank."""

import sys

from rlhf_pipeline.cli import main

sys.exit(main())
