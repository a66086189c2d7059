# An agent platform where each agent writes its own durable plan: the plan is produced
# at run time, each planned action is a step, a flaky tool is retried, a human approves
# the risky action (or the plan skips it when nobody answers), and the agent sleeps a
# day before its follow-up.
from tenantflow import WorkflowEntrypoint, WorkflowTimeoutError, log


def make_plan(goal):
    words = goal.split()
    return [{"action": "research", "topic": w} for w in words[:3]] + [
        {"action": "draft", "topic": goal},
        {"action": "publish", "topic": goal, "risky": True},
    ]


def call_tool(action, attempt, flaky_until):
    # The search tool fails on its first attempts, as real tools do.
    if action["action"] == "research" and attempt < flaky_until:
        raise ConnectionError("search tool timed out (attempt " + str(attempt) + ")")
    return {"action": action["action"], "topic": action["topic"], "attempt": attempt}


class TenantWorkflow(WorkflowEntrypoint):
    def run(self, event, step):
        goal = event.payload["goal"]
        flaky_until = event.payload.get("flaky_until", 2)
        plan = step.do("plan", lambda: make_plan(goal))
        log.info("plan has", len(plan), "actions")
        done = []
        for action in plan:
            if action.get("risky"):
                try:
                    approval = step.wait_for_event("approve " + action["action"],
                                                   type="human-approval", timeout="1 hour")
                    if not approval["payload"].get("ok"):
                        done.append({"action": action["action"], "skipped": "refused"})
                        continue
                except WorkflowTimeoutError:
                    done.append({"action": action["action"], "skipped": "no answer"})
                    continue
            result = step.do(
                action["action"],
                lambda ctx: call_tool(action, ctx.attempt, flaky_until),
                retries={"limit": 4, "delay": "1 second", "backoff": "exponential"},
            )
            done.append(result)
        step.sleep("wait a day before following up", "24 hours")
        follow_up = step.do("follow up", lambda: {"checked": goal})
        return {"goal": goal, "results": done, "follow_up": follow_up}


def fetch(request, env):
    instance = env.WORKFLOWS.create(params=request.json())
    return {"id": instance.id}
