"""The applications built on the library: every ``fastff`` command (``cli``) and the one timer
they share (``timing``). They import ``fastff``; the library never imports them."""
