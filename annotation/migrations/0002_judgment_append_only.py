"""Judgments are append-only: on PostgreSQL a trigger rejects any UPDATE of a judgment row.

Deleting rows stays possible (a whole campaign can be removed by an admin); editing an answer
after the fact never is. SQLite, used only for local runs, relies on the service layer.
"""

from django.db import migrations

CREATE = """
CREATE OR REPLACE FUNCTION annotation_judgment_append_only() RETURNS trigger AS $$
BEGIN
    RAISE EXCEPTION 'judgments are append-only (judgment %)', OLD.id
        USING ERRCODE = 'integrity_constraint_violation';
END;
$$ LANGUAGE plpgsql;
CREATE TRIGGER annotation_judgment_no_update
    BEFORE UPDATE ON annotation_judgment
    FOR EACH ROW EXECUTE FUNCTION annotation_judgment_append_only();
"""

DROP = """
DROP TRIGGER IF EXISTS annotation_judgment_no_update ON annotation_judgment;
DROP FUNCTION IF EXISTS annotation_judgment_append_only();
"""


def forwards(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(CREATE, params=None)


def backwards(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(DROP, params=None)


class Migration(migrations.Migration):
    dependencies = [("annotation", "0001_initial")]
    operations = [migrations.RunPython(forwards, backwards)]
