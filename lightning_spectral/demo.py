"""``python -m lightning_spectral.demo``: the documented command for the digits demo.

The code lives in :mod:`lightning_spectral.demos.digits`; this module only runs it, so the
command in the README keeps working.
"""

from lightning_spectral.demos.digits import main

if __name__ == "__main__":
    main()
