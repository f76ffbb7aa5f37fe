"""Notes: a small FastAPI app, written twice (``app_get_db.py`` and ``app.py``)."""
