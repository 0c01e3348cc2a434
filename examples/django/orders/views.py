"""JSON views. Each answer says which worker served it and which PostgreSQL backend it used.

* ``GET /products/``: every product and its stock (one autocommit SELECT: one short lease).
* ``POST /products/`` ``{"name": ..., "stock": ...}``: add a product.
* ``POST /orders/`` ``{"product": <id>, "quantity": n}``: in one transaction, lock the product row
  (``select_for_update``), check and take the stock, record the order; ``409`` when out of stock.
* ``GET /orders/summary/``: orders and quantity per product.
"""

import json
import os

from django.db import connection, transaction
from django.db.models import Count, Sum
from django.http import HttpRequest, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_http_methods

from .models import Order, Product


def _backend() -> int | None:
    """The PostgreSQL backend this request holds right now (``None`` outside a transaction)."""
    lease = connection.connection.lease
    return lease.backend_pid if lease else None


@csrf_exempt
@require_http_methods(["GET", "POST"])
def products(request: HttpRequest) -> JsonResponse:
    if request.method == "POST":
        body = json.loads(request.body)
        product = Product.objects.create(name=body["name"], stock=int(body["stock"]))
        return JsonResponse({"id": product.pk, "worker": os.getpid()}, status=201)
    rows = list(Product.objects.order_by("name").values("id", "name", "stock"))
    return JsonResponse({"products": rows, "worker": os.getpid()})


@csrf_exempt
@require_http_methods(["POST"])
def orders(request: HttpRequest) -> JsonResponse:
    body = json.loads(request.body)
    quantity = int(body["quantity"])
    with transaction.atomic():  # one backend from BEGIN to COMMIT
        product = Product.objects.select_for_update().get(pk=body["product"])
        backend = _backend()
        if product.stock < quantity:
            return JsonResponse(
                {"error": f"only {product.stock} {product.name} left", "backend": backend}, status=409
            )
        product.stock -= quantity
        product.save(update_fields=["stock"])
        order = Order.objects.create(product=product, quantity=quantity)
    return JsonResponse({"id": order.pk, "backend": backend, "worker": os.getpid()}, status=201)


@require_GET
def summary(request: HttpRequest) -> JsonResponse:
    rows = (
        Order.objects.values("product__name")
        .annotate(orders=Count("id"), quantity=Sum("quantity"))
        .order_by("product__name")
    )
    return JsonResponse(
        {r["product__name"]: {"orders": r["orders"], "quantity": r["quantity"]} for r in rows}
    )
