# The pipeline's checks, in a sibling module of main.py (imported like any module).


def lint_report(tree):
    issues = [name for name in tree["files"] if name.endswith(".py") and "tmp" in name]
    return {"ok": not issues, "issues": issues}


def run_tests(tree, env):
    tests = [name for name in tree["files"] if name.startswith("test_")]
    return {"passed": len(tests), "failed": 0, "venv": env["venv"]}
