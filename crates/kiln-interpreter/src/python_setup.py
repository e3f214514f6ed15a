# Run silently by kiln-interpreter in every new Python (IPython) kernel. Everything is
# registered lazily: nothing here imports pandas, matplotlib or PIL, and every step is
# optional, so a template without those packages still gets a working kernel.
def __kiln_setup():
    import sys

    ip = get_ipython()  # noqa: F821 (IPython puts it in the user namespace)
    if ip is None:
        return
    formatters = ip.display_formatter.formatters

    # Plain tracebacks (no ANSI codes) and untruncated sequence reprs.
    for scheme in ("nocolor", "NoColor"):
        try:
            ip.run_line_magic("colors", scheme)
            break
        except Exception:
            pass
    try:
        formatters["text/plain"].max_seq_length = 0
    except Exception:
        pass

    from IPython.core.formatters import BaseFormatter
    from traitlets import ObjectName

    class KilnFormatter(BaseFormatter):
        """Formats objects of classes named by (top-level package, class name), matched
        along the MRO (pandas 3 reports `pandas` as DataFrame's module, older ones
        `pandas.core.frame`).

        Kept apart from IPython's type registry on purpose: matplotlib's backend set-up
        (`select_figure_formats`) pops every `Figure` printer from every formatter.
        """

        # Only the handlers below produce these formats, never a repr method.
        print_method = ObjectName("_repr_kiln_unused_")
        _return_type = (dict, list)

        def __call__(self, obj):
            if self.enabled:
                for cls in type(obj).__mro__:
                    package = (getattr(cls, "__module__", None) or "").split(".")[0]
                    handler = self.kiln_handlers.get((package, cls.__name__))
                    if handler is not None:
                        try:
                            return handler(obj)
                        except Exception:
                            return None
            return None

    def add_format(mime, package, name, handler):
        formatter = formatters.get(mime)
        if not isinstance(formatter, KilnFormatter) and type(formatter).__name__ != "KilnFormatter":
            formatter = KilnFormatter(parent=ip.display_formatter)
            formatter.format_type = mime
            formatter.kiln_handlers = {}
            formatters[mime] = formatter
        formatter.kiln_handlers[(package, name)] = handler

    def plain(value):
        # NaN and infinity are not JSON; the wire format would reject them.
        if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
            return None
        if hasattr(value, "isoformat"):
            return value.isoformat()
        if hasattr(value, "item") and callable(value.item):
            try:
                return plain(value.item())
            except Exception:
                pass
        if isinstance(value, (str, int, float, bool)) or value is None:
            return value
        return str(value)

    def frame_data(frame):
        columns = frame.to_dict(orient="list")
        return {str(name): [plain(v) for v in values] for name, values in columns.items()}

    def figure_chart(figure):
        try:
            from e2b_charts import chart_figure_to_dict

            return chart_figure_to_dict(figure) or {}
        except Exception:
            return {}

    add_format("e2b/data", "pandas", "DataFrame", frame_data)
    add_format("e2b/chart", "matplotlib", "Figure", figure_chart)

    def as_json(obj):
        try:
            import orjson

            options = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS
            data = orjson.loads(orjson.dumps(obj, option=options))
        except ImportError:
            import json

            try:
                data = json.loads(json.dumps(obj, default=str), parse_constant=lambda _: None)
            except Exception:
                return None
        except Exception:
            return None
        return data, {"expanded": True}

    try:
        formatters["application/json"].for_type(dict, as_json)
        formatters["application/json"].for_type(list, as_json)
    except Exception:
        pass

    # PIL: `Image.show()` and `Image.save("path")` display the image as a result.
    def patch_pil(image_module):
        cls = image_module.Image
        if getattr(cls, "_kiln_patched", False):
            return
        from IPython.display import display

        original_save = cls.save

        def show(self, title=None):
            display(self)

        def save(self, fp, format=None, **params):
            result = original_save(self, fp, format, **params)
            if isinstance(fp, str) or hasattr(fp, "__fspath__"):
                try:
                    display(self)
                except Exception:
                    pass
            return result

        cls.show = show
        cls.save = save
        cls._kiln_patched = True

    if "PIL.Image" in sys.modules:
        patch_pil(sys.modules["PIL.Image"])
        return

    import importlib.abc
    import importlib.util

    class PilHook(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != "PIL.Image":
                return None
            sys.meta_path.remove(self)  # one-shot; also keeps find_spec below from recursing
            spec = importlib.util.find_spec(name)
            if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
                return spec
            loader_exec = spec.loader.exec_module

            class Loader(importlib.abc.Loader):
                def create_module(self, spec):
                    return None

                def exec_module(self, module):
                    loader_exec(module)
                    try:
                        patch_pil(module)
                    except Exception:
                        pass

            spec.loader = Loader()
            return spec

    sys.meta_path.insert(0, PilHook())


try:
    __kiln_setup()
finally:
    del __kiln_setup
