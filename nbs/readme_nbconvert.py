# nbconvert config for README.md (`make readme`; tests/test_repo.py checks README.md against it): the tour's code cells
# without their nbdev directive lines (`#| slow` and the like say how the tests run a cell, not what it does).
from nbconvert.preprocessors import Preprocessor

class StripDirectives(Preprocessor):
    "Drop lines starting with `#|` from code cells."
    def preprocess_cell(self, cell, resources, index):
        if cell.cell_type == 'code':
            cell.source = '\n'.join(l for l in cell.source.splitlines() if not l.lstrip().startswith('#|'))
        return cell, resources

c = get_config()  # noqa: F821 (traitlets config file)
c.MarkdownExporter.preprocessors = [StripDirectives]
