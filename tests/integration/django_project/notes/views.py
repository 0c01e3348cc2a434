"""GET lists notes, POST adds one; both report the backend the request used."""

import json

from django.db import connection, transaction
from django.http import HttpRequest, JsonResponse
from django.views.decorators.csrf import csrf_exempt

from .models import Note


@csrf_exempt
def notes(request: HttpRequest) -> JsonResponse:
    if request.method == "POST":
        with transaction.atomic():
            note = Note.objects.create(title=json.loads(request.body)["title"])
            with connection.cursor() as cur:
                cur.execute("select pg_backend_pid()")
                (backend,) = cur.fetchone()
        return JsonResponse({"id": note.pk, "backend": backend}, status=201)
    return JsonResponse({"titles": list(Note.objects.order_by("id").values_list("title", flat=True))})
