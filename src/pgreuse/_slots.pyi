# The C module built from _slots.c (optional). Its Slots type is described once, as
# pgreuse.slots.SlotsAPI (PySlots is its Python reference), and check() as pgreuse.slots.check_py.
from collections.abc import Callable

from pgreuse.slots import SlotsAPI

Slots: type[SlotsAPI]
check: Callable[[int, int], int]
