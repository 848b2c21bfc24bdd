"""The stranger pool's rules, driven with numbers for time: no reactor, no Clock."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from securemig.protocol.strangers import CloseStranger, StrangerPool


class StrangerPoolTests(SynchronousTestCase):
    def test_first_record_in_time_leaves_the_pool(self) -> None:
        """A connection whose record authenticates before its time is no
        longer a stranger: no timer, nothing to close."""
        pool: StrangerPool[str] = StrangerPool(timeout=5.0)
        self.assertEqual(pool.admit("a", 10.0), [])
        self.assertEqual(pool.get_timer(), 15.0)
        self.assertTrue(pool.record_received("a"))
        self.assertIsNone(pool.get_timer())
        self.assertEqual(pool.handle_timer(100.0), [])
        self.assertFalse(pool.record_received("a"))
        self.assertEqual(pool.closed, 0)

    def test_expiry_closes_each_at_its_own_time(self) -> None:
        """Each stranger has the timeout from when it connected; waking early closes none."""
        pool: StrangerPool[str] = StrangerPool("live stream connections", timeout=5.0)
        pool.admit("a", 0.0)
        pool.admit("b", 3.0)
        self.assertEqual(pool.handle_timer(4.9), [])
        self.assertEqual(
            pool.handle_timer(5.0), [CloseStranger("a", "no authenticated record within 5 s")]
        )
        self.assertEqual(pool.get_timer(), 8.0)
        self.assertEqual([c.conn_id for c in pool.handle_timer(8.0)], ["b"])
        self.assertIsNone(pool.get_timer())
        self.assertEqual(pool.closed, 2)

    def test_above_the_cap_the_oldest_goes(self) -> None:
        """One more than max_pending closes the oldest, not the newcomer."""
        pool: StrangerPool[int] = StrangerPool("data connections", max_pending=3)
        for n in range(3):
            self.assertEqual(pool.admit(n, float(n)), [])
        self.assertEqual(
            pool.admit(3, 3.0),
            [CloseStranger(0, "more than 3 data connections waiting for a first record")],
        )
        self.assertEqual(list(pool), [1, 2, 3])
        self.assertEqual(pool.get_timer(), 1.0 + pool.timeout)

    def test_held_pool_starts_its_clocks_at_release(self) -> None:
        """Held (nothing may be read yet): no clock runs; at release each
        stranger gets the timeout from then (or from its connection, if later)."""
        pool: StrangerPool[str] = StrangerPool(timeout=5.0, held=True)
        pool.admit("a", 1.0)
        self.assertIsNone(pool.get_timer())
        self.assertEqual(pool.handle_timer(1000.0), [])
        pool.release(20.0)
        pool.admit("b", 22.0)
        self.assertEqual(pool.due("a"), 25.0)
        self.assertEqual(pool.due("b"), 27.0)
        self.assertEqual(pool.get_timer(), 25.0)
        pool.release(40.0)  # once
        self.assertEqual(pool.due("a"), 25.0)

    def test_refuse_forget_and_close_all(self) -> None:
        """A refused stranger is closed with the port's reason; one that
        left is forgotten (nothing to close); close_all closes the rest."""
        pool: StrangerPool[str] = StrangerPool()
        for name in "abc":
            pool.admit(name, 0.0)
        self.assertEqual(pool.refuse("a", "bad record"), [CloseStranger("a", "bad record")])
        self.assertEqual(pool.refuse("a", "again"), [])
        pool.forget("b")
        self.assertEqual(pool.close_all("bound"), [CloseStranger("c", "bound")])
        self.assertEqual(len(pool), 0)
        self.assertEqual(pool.closed, 2)
