"""The service's web pages: HTML, JavaScript and CSS shipped as package data and served by
:mod:`reflade.serve.pages` (``/``, ``/vote``, ``/static/NAME``). Plain files, no build step, no external URL."""
