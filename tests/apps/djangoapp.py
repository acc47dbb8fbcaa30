"""A one-file Django project served end to end."""

from django.conf import settings

settings.configure(
    DEBUG=False,
    DEBUG_PROPAGATE_EXCEPTIONS=True,  # let the server log the traceback
    SECRET_KEY="forkserve-tests-only",
    ROOT_URLCONF=__name__,
    ALLOWED_HOSTS=["*"],
    MIDDLEWARE=[],
)

from django.core.wsgi import get_wsgi_application  # noqa: E402
from django.http import HttpResponse, JsonResponse  # noqa: E402
from django.urls import path  # noqa: E402


def index(request):
    return HttpResponse("Hello from Django")


def echo(request, rest):
    return JsonResponse({
        "length": len(request.body),
        "path": request.path,
        "raw_uri": request.META["RAW_URI"],
        "host": request.get_host(),
    })


urlpatterns = [path("", index), path("echo/<path:rest>", echo)]

application = get_wsgi_application()
