"""``mor serve``: an OpenAI-compatible HTTP server on the continuous depth-wise batching engine, with a playground
page that colours each token by its recursion depth. Needs the ``serve`` extra (``pip install 'mor[serve]'``)."""
