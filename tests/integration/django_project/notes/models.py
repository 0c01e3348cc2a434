"""One model: a note with a title, a counter and a creation time."""

from django.db import models


class Note(models.Model):
    title = models.CharField(max_length=100, unique=True)
    hits = models.IntegerField(default=0)
    created = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return self.title
