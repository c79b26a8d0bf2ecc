"""The no-object study (``tools/study_nonobject.py``): its fixed design, data, strict scoring and
report, split out of the script so each part stays readable."""
