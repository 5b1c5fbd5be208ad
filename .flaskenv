# Read by `flask` (python-dotenv) from the project root, so the guide's `flask billing …` works as
# written. Variables already set in the environment win.
FLASK_APP=billing
