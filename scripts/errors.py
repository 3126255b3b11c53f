"""One clear message for a bad input, instead of a long traceback through the config parser."""


class BundleError(SystemExit):
    """Stop the run with a message naming the problem and its fix.

    It derives from ``SystemExit`` so that ``monai.bundle``'s expression evaluation, which wraps ordinary
    exceptions, lets it through: the user sees one line on stderr and the process exits with status 1.
    """

    def __init__(self, problem: str, fix: str):
        self.problem, self.fix = problem, fix
        super().__init__(f"ERROR: {problem}\n  Fix: {fix}")
