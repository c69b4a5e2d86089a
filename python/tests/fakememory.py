"""A fake memory for the companion's tests: a pool with a budget whose holdings are the live
FakeModels, patched over qvshim.memory by the `fake` fixture (conftest.py). Shared by
test_models.py and test_events.py; the real budget is in test_live.py."""

from qvshim import memory


class FakeMemory:
    """A pool with a budget, whose holdings are the live FakeModels."""

    def __init__(self, budget):
        self.budget = budget
        self.held = 0

    def headroom(self, pool, margin):
        return memory.Room(int(self.budget * (1 - margin)) - self.held, self.budget, self.held)

    def in_use(self):
        return {"host": self.held}


class FakeModel:
    def __init__(self, fake, size):
        self.fake, self.size = fake, size
        fake.held += size

    def __del__(self):
        self.fake.held -= self.size
