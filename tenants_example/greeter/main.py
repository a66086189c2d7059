# The seed article's minimal example: load a user, cool off, greet them.
from tenantflow import WorkflowEntrypoint


class TenantWorkflow(WorkflowEntrypoint):
    def run(self, event, step):
        user = step.do("load user", lambda: {"name": event.payload.get("name", "world")})
        step.sleep("cool off", "2 seconds")
        greeting = step.do("greet", lambda: "Hello, " + user["name"] + "!")
        print(greeting)
        return {"greeting": greeting}


def fetch(request, env):
    instance = env.WORKFLOWS.create(params=request.json())
    return {"id": instance.id}
