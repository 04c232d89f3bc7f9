"""
C{GET /admin/limits?agent=NAME} (SPEC section 5): one agent's limits,
budgets and current use, merged by the admin API from every admin section
that provides L{IAgentUse} (rate limits, token budgets).
"""

from __future__ import annotations

from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from tests.test_admin import AdminHarness
from tests.test_tokens import AUTH, HELLO, TokenHarness, config


def agent_use(gw: TokenHarness, query: str) -> Any:
    admin = AdminHarness(gw.testcase, sections=gw.plane.parts.admin_sections)
    return admin.request("GET", "/admin/limits" + query)


class AgentUseTests(SynchronousTestCase):

    def test_limits_and_budgets(self) -> None:
        """
        The agent's rate limit (configured, last decision, stored state) and
        its budgets: limit, used, this gateway's reservations in flight,
        remaining and seconds to the window's end; a call in flight shows
        as reserved, and as used once it settles.
        """
        gw = TokenHarness(self, config(agent={"rate_limit": "100/minute",
                                              "token_limit": "10000/minute",
                                              "spend_limit": "5/day"},
                                       models={"prices": {"sim-small": {"prompt": 1.0,
                                                                        "completion": 2.0}}}))
        self.assertEqual(gw.call("/v1/chat/completions", HELLO, AUTH).code, 200)
        gw.clock.advance(10 - gw.clock.seconds())
        first = agent_use(gw, "?agent=finance").json()
        self.assertEqual(first["agent"], "finance")
        self.assertTrue(first["known"])
        self.assertEqual(first["configured"]["rate_limit"], "100/minute")
        self.assertEqual(first["limits"]["agent"]["remaining"], 99)
        self.assertEqual(first["current"]["key"], "rl:token_bucket:agent:finance")
        tokens = first["budgets"]["token_limit"]
        used = tokens["used"]
        self.assertGreater(used, 0)
        self.assertEqual(tokens, {"limit": "10000/minute", "used": used, "reserved": 0.0,
                                  "remaining": 10000 - used, "reset": 50})
        spend = first["budgets"]["spend_limit"]
        self.assertEqual((spend["limit"], spend["reserved"]), ("5/day", 0.0))
        self.assertAlmostEqual(spend["used"], used / 1000 + 5 / 1000, 2)  # 7 prompt, 5 completion

        # A second call held upstream: its worst case (7 prompt + 1024) is reserved.
        d = gw.start("POST", "/v1/chat/completions", HELLO, AUTH)
        held = agent_use(gw, "?agent=finance").json()["budgets"]["token_limit"]
        self.assertEqual((held["used"], held["reserved"], held["remaining"]),
                         (used, 1031.0, 10000 - used - 1031))
        for _ in range(50):
            gw.clock.advance(0.01)
            gw.flush()
        self.assertEqual(gw.finish(d).code, 200)
        done = agent_use(gw, "?agent=finance").json()["budgets"]["token_limit"]
        self.assertEqual((done["used"], done["reserved"]), (2 * used, 0.0))

    def test_budgets_without_rate_limits(self) -> None:
        """An agent with budgets and no rate limit configured anywhere: its budgets."""
        gw = TokenHarness(self, config(agent={"token_limit": "1000/minute"}))
        gw.call("/v1/chat/completions", HELLO, AUTH)
        answer = agent_use(gw, "?agent=finance")
        self.assertEqual(answer.code, 200)
        shown = answer.json()
        self.assertEqual(set(shown), {"agent", "budgets"})
        self.assertEqual(shown["budgets"]["token_limit"]["limit"], "1000/minute")

    def test_unknown_and_missing(self) -> None:
        """An agent nobody configured: nothing but its name (and C{known: false}); no
        C{?agent}: 400."""
        gw = TokenHarness(self, config(agent={"rate_limit": "10/minute",
                                              "token_limit": "1000/minute"}))
        self.assertEqual(agent_use(gw, "?agent=nobody").json(),
                         {"agent": "nobody", "known": False, "configured": {}, "refused": 0,
                          "current": {}})
        answer = agent_use(gw, "")
        self.assertEqual(answer.code, 400)
        self.assertEqual(answer.json()["error"]["code"], "missing_agent")
