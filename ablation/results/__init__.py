"""Results stage: run folders collected into tables, and the report's tables and figures from them. Torch-free.

collect (runs.csv, curves.csv), runfiles (reading run-folder files in bulk), report (tables and figures).
"""
