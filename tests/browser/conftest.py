# The headless-Chromium fixtures, for every test in this folder. A test module elsewhere
# imports them the same way.
from tests.browser.chromium import browser, chromium_executable  # noqa: F401
