"""Extensions written the way a user writes them: one file each, named on the command line by import path
(see the README, "Extend"). Run the commands from the repository root so that ``examples`` is importable."""
