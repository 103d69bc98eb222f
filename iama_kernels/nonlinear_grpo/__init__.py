"""The one-pass op: advantages from rewards, then the token loss, in one call."""
