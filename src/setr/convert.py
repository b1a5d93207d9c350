"""``python -m setr.convert SRC DST [flags]``: an alias of ``setr-convert`` (:func:`setr.checkpoint.convert.main`)
that older commands and scripts use."""

from setr.checkpoint.convert import main

if __name__ == "__main__":
    raise SystemExit(main())
