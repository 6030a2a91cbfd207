"""ML staff pages: runs, rounds, the loop schedule and the model registry.

Function views, thin: each reads through ``training.selectors`` or writes through one service
(``training.services.runs`` / ``rounds``), and decides access with ``training.access`` (the
campaign's roles, the same rules as the API). The live parts of the run and round pages are
HTMX partials polled every two seconds while something is still queued or running; a
terminal partial is rendered without its trigger, so polling stops by itself.
"""
