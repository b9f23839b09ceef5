"""Packaging for agent-distillation: every field comes from settings.ini (nbdev 2 layout)."""
from configparser import ConfigParser
from pathlib import Path
import setuptools

cfg = ConfigParser(delimiters=['='])
cfg.read('settings.ini', encoding='utf-8')
cfg = cfg['DEFAULT']
req = lambda key: cfg.get(key, '').split()

setuptools.setup(
    name=cfg['repo'], version=cfg['version'], description=cfg['description'],
    long_description=Path('README.md').read_text(encoding='utf-8') if Path('README.md').exists() else '',
    long_description_content_type='text/markdown',
    author=cfg['author'], author_email=cfg['author_email'], license='Apache-2.0',
    url=cfg['git_url'], python_requires=f">={cfg['min_python']}",
    packages=setuptools.find_packages(include=[cfg['lib_name'], cfg['lib_name'] + '.*']),
    include_package_data=True, zip_safe=False,
    install_requires=req('requirements'),
    extras_require={'dev': req('dev_requirements'), 'serve': req('serve_requirements'), 'bench': req('bench_requirements')},
    entry_points={'console_scripts': req('console_scripts'), 'nbdev': [f"{cfg['lib_path']}={cfg['lib_path']}._modidx:d"]},
    keywords=cfg['keywords'],
    classifiers=['Programming Language :: Python :: 3', 'License :: OSI Approved :: Apache Software License'],
)
