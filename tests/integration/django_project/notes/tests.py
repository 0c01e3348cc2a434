"""Django's test runner on pgreuse: leases per statement and per atomic(), and the ORM features
that must keep working in transaction mode (admin, iterator, select_for_update, bulk_create).

``connection.connection`` is the :class:`pgreuse.Connection`; its ``lease`` is the backend held now.
"""

import threading

import psycopg
from django.contrib.auth.models import User
from django.db import IntegrityError, connection, transaction
from django.test import TestCase, TransactionTestCase

import pgreuse

from .models import Note


def lease() -> pgreuse.Lease | str | None:
    """The backend held now: the claimed one, ``"proxied"`` for a transaction that goes through the
    broker's proxy (no backend was idle when it began), or ``None`` between transactions."""
    conn = connection.connection
    assert isinstance(conn, pgreuse.Connection), type(conn)
    if conn.lease is None and conn.proxied:
        return "proxied"
    return conn.lease


def other_connection() -> pgreuse.Connection:
    """A second pgreuse connection to the same broker, as another worker would have."""
    s = connection.settings_dict
    return pgreuse.connect(host=s["HOST"], port=s["PORT"], dbname=s["NAME"], autocommit=True)


class LeasePerTransaction(TransactionTestCase):
    def test_autocommit_statements_return_the_backend_after_each_statement(self) -> None:
        Note.objects.create(title="a")
        assert lease() is None
        assert Note.objects.count() == 1
        assert lease() is None
        Note.objects.filter(title="a").update(hits=5)
        assert lease() is None
        assert Note.objects.get(title="a").hits == 5

    def test_atomic_holds_one_backend_through_nested_savepoints(self) -> None:
        with transaction.atomic():
            Note.objects.create(title="outer")
            held = lease()
            assert held is not None
            with transaction.atomic():  # SAVEPOINT
                Note.objects.create(title="inner")
                assert lease() == held
                try:
                    with transaction.atomic():  # SAVEPOINT, rolled back
                        Note.objects.create(title="rolled back")
                        raise RuntimeError("undo the innermost block")
                except RuntimeError:
                    pass
                assert lease() == held
            assert lease() == held
        assert lease() is None
        assert sorted(Note.objects.values_list("title", flat=True)) == ["inner", "outer"]

    def test_an_error_inside_atomic_rolls_back_and_returns_the_backend(self) -> None:
        Note.objects.create(title="dup")
        with self.assertRaises(IntegrityError), transaction.atomic():
            Note.objects.create(title="fresh")
            Note.objects.create(title="dup")
        assert lease() is None
        assert list(Note.objects.values_list("title", flat=True)) == ["dup"]

    def test_select_for_update_locks_the_row_until_the_block_ends(self) -> None:
        note = Note.objects.create(title="locked")
        other = other_connection()
        try:
            with transaction.atomic():
                Note.objects.select_for_update().get(pk=note.pk)
                assert lease() is not None
                with self.assertRaises(psycopg.errors.LockNotAvailable):
                    other.execute("select * from notes_note where id = %s for update nowait", [note.pk])
            # Committed: the lock is gone and the other connection gets the row at once.
            row = other.execute("select title from notes_note where id = %s for update nowait", [note.pk])
            assert row.fetchone() == ("locked",)
        finally:
            other.close()

    def test_bulk_create_returns_primary_keys(self) -> None:
        notes = Note.objects.bulk_create(Note(title=f"bulk {i}") for i in range(500))
        assert all(n.pk is not None for n in notes)
        assert lease() is None
        assert Note.objects.count() == 500

    def test_iterator_reads_in_chunks_without_a_server_side_cursor(self) -> None:
        Note.objects.bulk_create(Note(title=f"it {i}", hits=i) for i in range(2000))
        total = sum(n.hits for n in Note.objects.order_by("id").iterator(chunk_size=100))
        assert total == sum(range(2000))
        assert lease() is None
        with transaction.atomic():
            assert sum(1 for _ in Note.objects.iterator(chunk_size=100)) == 2000

    def test_session_state_left_by_a_raw_statement_never_reaches_the_next_transaction(self) -> None:
        # Not a reported parameter: only the statement guard sees it, through Django's cursor too.
        for _ in range(3):
            with connection.cursor() as cursor:
                cursor.execute("SET statement_timeout = 12345")
                cursor.execute("SHOW statement_timeout")
                assert cursor.fetchone() == ("0",)
        with connection.cursor() as cursor:
            cursor.execute("CREATE TEMP TABLE scratch (a int)")
            cursor.execute("SELECT to_regclass('pg_temp.scratch') IS NULL")
            assert cursor.fetchone() == (True,)

    def test_threads_share_the_brokers_backends(self) -> None:
        # Each thread has its own Django connection; the broker (--max-size 2) serves them all.
        errors: list[BaseException] = []

        def work(i: int) -> None:
            try:
                for j in range(20):
                    with transaction.atomic():
                        Note.objects.create(title=f"t{i}-{j}")
            except BaseException as exc:
                errors.append(exc)
            finally:
                connection.close()

        threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == [], errors
        assert Note.objects.count() == 120


class AdminPages(TestCase):
    @classmethod
    def setUpTestData(cls) -> None:
        User.objects.create_superuser("admin", "admin@example.com", "s3cret-pw")
        Note.objects.create(title="visible in the changelist")

    def test_superuser_logs_in_and_loads_the_changelist(self) -> None:
        response = self.client.post(
            "/admin/login/?next=/admin/", {"username": "admin", "password": "s3cret-pw"}
        )
        assert response.status_code == 302, response.content[:2000]
        response = self.client.get("/admin/notes/note/")
        assert response.status_code == 200
        assert b"visible in the changelist" in response.content
        response = self.client.get("/admin/notes/note/add/")
        assert response.status_code == 200

    def test_views_read_and_write(self) -> None:
        response = self.client.post("/notes/", '{"title": "from a view"}', content_type="application/json")
        assert response.status_code == 201
        assert self.client.get("/notes/").json()["titles"] == ["visible in the changelist", "from a view"]


class Checks(TestCase):
    def test_the_settings_pass_pgreuse_checks(self) -> None:
        assert connection.validation.check() == []
        assert connection.vendor == "postgresql"
        assert connection.display_name == "PostgreSQL (pgreuse)"
