"""Caption review in the browser (``make captions DS=<ds>``): a local page that shows every
image beside its auto caption, human edit and training caption, and writes the edits to
``data/<ds>/metadata.csv``, the file the merge stage reads. The data it shows is
:mod:`.dataset`, the file it writes :mod:`.table`, the server :mod:`.server`; the page is plain
HTML and JavaScript in ``static/``."""
