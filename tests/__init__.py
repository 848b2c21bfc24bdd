"""securemig tests (trial)."""

import os
from pathlib import Path

# The suite runs on its own settings, never the machine's: a host that has an
# /etc/securemig/securemig.toml (or a $SECUREMIG_CONFIG) would otherwise
# change what every `securemig` the tests start does.  An empty file is no
# configuration; tests of the configuration file set their own.
os.environ["SECUREMIG_CONFIG"] = str(Path(__file__).with_name("no-config.toml"))
