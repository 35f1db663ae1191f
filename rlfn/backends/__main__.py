"""``python -m rlfn.backends``: the table of inference backends, from the registry."""

from . import describe

for line in describe():
    print(line)
