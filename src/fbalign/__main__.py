import os
import sys

from .cli import main

code = main()
if int(os.environ.get("WORLD_SIZE", "1")) > 1:
    # A rank under torchrun, its process group destroyed and its files written and closed: leave without running
    # C++ static destructors, one of which (torch 2.13's gloo) aborts about one exit in 20 ("terminate called
    # without an active exception", measured on 2 gloo ranks), which torchrun then reports as a failed rank.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
sys.exit(code)
