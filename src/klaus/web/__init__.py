"""`klaus serve`: the local web gallery (needs the 'web' extra: starlette, uvicorn, jinja2, python-multipart)."""
