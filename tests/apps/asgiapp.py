"""An ASGI app, which the WSGI-only server must refuse with a clear message."""


async def app(scope, receive, send):
    pass
