# A CI/CD product where each repository brings its pipeline: checkout, install, then
# lint, test and build in parallel, a comment on the pull request, and a deploy that
# waits for a human to approve it.
import hashlib

from tenantflow import WorkflowEntrypoint, WorkflowTimeoutError, log

from checks import lint_report, run_tests


def checkout(repo, sha):
    return {"repo": repo, "sha": sha, "files": ["app.py", "test_app.py", "README.md"]}


def install(tree):
    lock = hashlib.sha256(("deps:" + tree["sha"]).encode()).hexdigest()[:12]
    return {"venv": "venv-" + lock, "packages": 42}


def build(tree):
    digest = hashlib.sha256((tree["repo"] + tree["sha"]).encode()).hexdigest()[:16]
    return {"artifact": tree["repo"] + ":" + digest}


class TenantWorkflow(WorkflowEntrypoint):
    def run(self, event, step):
        repo = event.payload["repo"]
        sha = event.payload["sha"]
        tree = step.do("checkout", lambda: checkout(repo, sha))
        env = step.do("install", lambda: install(tree))
        results = step.parallel(
            {
                "lint": lambda: lint_report(tree),
                "test": lambda: run_tests(tree, env),
                "build": lambda: build(tree),
            },
            retries={"limit": 2, "delay": "5 seconds"},
        )
        passed = results["lint"]["ok"] and results["test"]["failed"] == 0
        summary = "all checks passed" if passed else "checks failed"
        step.do("comment on PR", lambda: {"pr": event.payload.get("pr"), "body": summary})
        if not passed:
            return {"deployed": False, "reason": summary}
        try:
            approval = step.wait_for_event("deploy approval", type="approve-deploy",
                                           timeout="1 hour")
        except WorkflowTimeoutError:
            log.warning("nobody approved the deploy")
            return {"deployed": False, "reason": "approval timed out"}
        approver = approval["payload"].get("by", "someone")
        release = step.do("deploy", lambda: {"released": results["build"]["artifact"],
                                             "approved_by": approver})
        return {"deployed": True, "release": release}


def fetch(request, env):
    body = request.json()
    instance = env.WORKFLOWS.create(params=body)
    return {"id": instance.id, "pipeline": body.get("repo")}
