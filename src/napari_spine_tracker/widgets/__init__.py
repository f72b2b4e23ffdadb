"""Qt/magicgui views over ``core`` and ``io``. Nothing outside this package imports it."""
