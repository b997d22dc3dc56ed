"""`dsv4.Error`: the base of every error that is the user's to fix (a bad option, an unreadable
file, a run that cannot continue). Its message is one line that names the culprit, so
`dsv4 <command>` prints it and exits 2 instead of showing a traceback; anything else is a bug.

The subclasses keep their older bases too (ValueError, RuntimeError), so code that catches
those still does.
"""


class Error(Exception):
    """A problem the user can fix; the message says which value, file or step, in one line."""
