"""The one exception type for mistakes a user can make (config, data, paths, checkpoints).

Entry points catch it and print its message as a single line, then exit non-zero without a traceback.
The message says what is wrong and what to do.
"""


class UserError(Exception):
  """A user-fixable problem; str(error) is the whole message shown to the user."""
