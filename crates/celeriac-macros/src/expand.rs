//! The expansion of `#[task]`.

use proc_macro2::TokenStream;
use quote::{format_ident, quote, quote_spanned};
use syn::spanned::Spanned;
use syn::{FnArg, GenericArgument, ItemFn, Pat, PathArguments, ReturnType, Type};

use crate::options::Options;

struct Param {
    ident: syn::Ident,
    ty: Type,
}

enum ContextArg {
    None,
    Owned,
    Borrowed,
}

pub(crate) fn expand(attr: TokenStream, item: TokenStream) -> syn::Result<TokenStream> {
    let mut options = Options::default();
    let parser = syn::meta::parser(|meta| options.parse(&meta));
    syn::parse::Parser::parse2(parser, attr)?;
    let func: ItemFn = syn::parse2(item)?;
    let sig = &func.sig;

    if let Some(p) = sig.generics.params.first() {
        return Err(syn::Error::new(
            p.span(),
            "task functions cannot be generic: the worker needs one concrete signature",
        ));
    }
    if let Some(w) = &sig.generics.where_clause {
        return Err(syn::Error::new(
            w.span(),
            "task functions cannot have a where clause",
        ));
    }
    if let Some(u) = &sig.unsafety {
        return Err(syn::Error::new(u.span(), "task functions cannot be unsafe"));
    }
    if let Some(v) = &sig.variadic {
        return Err(syn::Error::new(
            v.span(),
            "task functions cannot be variadic",
        ));
    }

    let mut context = ContextArg::None;
    let mut params = Vec::new();
    for (i, arg) in sig.inputs.iter().enumerate() {
        let FnArg::Typed(pt) = arg else {
            return Err(syn::Error::new(
                arg.span(),
                "a task is a free function; it cannot take self",
            ));
        };
        if i == 0 {
            if let Some(kind) = context_kind(&pt.ty) {
                context = kind;
                continue;
            }
        }
        let Pat::Ident(pi) = &*pt.pat else {
            return Err(syn::Error::new(
                pt.pat.span(),
                "task parameters must be plain names: they are matched to Celery kwargs by name",
            ));
        };
        if context_kind(&pt.ty).is_some() {
            return Err(syn::Error::new(
                pt.ty.span(),
                "the TaskContext parameter must come first",
            ));
        }
        if let Type::Reference(r) = &*pt.ty {
            return Err(syn::Error::new(
                r.span(),
                "task parameters must be owned types (e.g. String, not &str): they are decoded from the message",
            ));
        }
        if let Type::ImplTrait(t) = &*pt.ty {
            return Err(syn::Error::new(
                t.span(),
                "task parameters need concrete types, not impl Trait",
            ));
        }
        params.push(Param {
            ident: pi.ident.clone(),
            ty: (*pt.ty).clone(),
        });
    }

    let (output, fallible) = output_type(&sig.output);
    let fn_ident = &sig.ident;
    let vis = &func.vis;
    let name = match &options.name {
        Some(n) => quote!(#n),
        None => quote!(::std::concat!(
            ::std::module_path!(),
            "::",
            ::std::stringify!(#fn_ident)
        )),
    };
    let setters = &options.setters;
    let names: Vec<String> = params.iter().map(|p| p.ident.to_string()).collect();
    let idents: Vec<&syn::Ident> = params.iter().map(|p| &p.ident).collect();
    let types: Vec<&Type> = params.iter().map(|p| &p.ty).collect();
    let indexes = 0..params.len();

    let args = format_ident!("__celeriac_args");
    let ctx = format_ident!("__celeriac_ctx");
    let ctx_arg = match context {
        ContextArg::None => quote!(),
        ContextArg::Owned => quote!(#ctx,),
        ContextArg::Borrowed => quote!(&#ctx,),
    };
    let decode = quote! {
        #( let #idents: #types = #args.take(#indexes, #names)?; )*
        #args.finish(&[#(#names),*])?;
    };
    let convert = if fallible {
        quote! {
            match __out {
                ::std::result::Result::Ok(v) => ::celeriac::__private::encode_output(v),
                ::std::result::Result::Err(e) => ::std::result::Result::Err(::std::convert::Into::<::celeriac::__private::TaskError>::into(e)),
            }
        }
    } else {
        quote!(::celeriac::__private::encode_output(__out))
    };
    let result_ty = quote!(::std::result::Result<::celeriac::__private::serde_json::Value, ::celeriac::__private::TaskError>);
    let handler = if sig.asyncness.is_some() {
        quote! {
            ::celeriac::__private::Handler::Async(::std::sync::Arc::new(
                |#ctx: ::celeriac::__private::TaskContext, mut #args: ::celeriac::__private::Args| {
                    ::std::boxed::Box::pin(async move {
                        let _ = &#ctx;
                        #decode
                        let __out = #fn_ident(#ctx_arg #(#idents),*).await;
                        #convert
                    }) as ::celeriac::__private::BoxFuture<'static, #result_ty>
                },
            ))
        }
    } else {
        quote! {
            ::celeriac::__private::Handler::Blocking(::std::sync::Arc::new(
                |#ctx: ::celeriac::__private::TaskContext, mut #args: ::celeriac::__private::Args| -> #result_ty {
                    let _ = &#ctx;
                    #decode
                    let __out = #fn_ident(#ctx_arg #(#idents),*);
                    #convert
                },
            ))
        }
    };

    let doc_struct = format!(
        "The task behind [`fn@{fn_ident}`]: send it with `{fn_ident}::delay(&app, ..)` or `{fn_ident}::s(..)`."
    );
    let span = fn_ident.span();
    let struct_def = quote_spanned! {span=>
        #[allow(non_camel_case_types)]
        #[doc = #doc_struct]
        #[derive(Debug, Clone, Copy, Default)]
        #vis struct #fn_ident {}
    };

    Ok(quote! {
        #func

        #struct_def

        impl ::celeriac::__private::Task for #fn_ident {
            type Output = #output;
            const NAME: &'static str = #name;

            fn definition() -> ::celeriac::__private::TaskDef {
                ::celeriac::__private::TaskDef {
                    name: ::std::string::String::from(<Self as ::celeriac::__private::Task>::NAME),
                    params: &[#(#names),*],
                    options: <Self as ::celeriac::__private::Task>::options(),
                    handler: #handler,
                }
            }

            fn options() -> ::celeriac::__private::TaskOptions {
                #[allow(unused_mut)]
                let mut o = ::celeriac::__private::TaskOptions::default();
                #(#setters)*
                o
            }
        }

        #[allow(dead_code, clippy::too_many_arguments)]
        impl #fn_ident {
            /// A signature of this task with these arguments, to set options and send.
            #vis fn s(#(#idents: #types),*) -> ::celeriac::Signature<#output> {
                ::celeriac::Signature::__typed(
                    <Self as ::celeriac::__private::Task>::NAME,
                    ::std::vec![#(::celeriac::__private::serde_json::to_value(&#idents)),*],
                    <Self as ::celeriac::__private::Task>::options,
                )
            }

            /// Sends this task with these arguments now.
            #vis async fn delay(app: &::celeriac::App, #(#idents: #types),*) -> ::celeriac::Result<::celeriac::AsyncResult<#output>> {
                Self::s(#(#idents),*).apply_async(app).await
            }
        }

        ::celeriac::__private::inventory::submit! {
            ::celeriac::__private::Registration(<#fn_ident as ::celeriac::__private::Task>::definition)
        }
    })
}

/// Whether `ty` is `TaskContext` or `&TaskContext` (by its last path segment).
fn context_kind(ty: &Type) -> Option<ContextArg> {
    match ty {
        Type::Path(p)
            if p.path
                .segments
                .last()
                .is_some_and(|s| s.ident == "TaskContext") =>
        {
            Some(ContextArg::Owned)
        }
        Type::Reference(r) if r.mutability.is_none() => match &*r.elem {
            Type::Path(p)
                if p.path
                    .segments
                    .last()
                    .is_some_and(|s| s.ident == "TaskContext") =>
            {
                Some(ContextArg::Borrowed)
            }
            _ => None,
        },
        _ => None,
    }
}

/// The task's output type and whether the function returns a `Result`.
fn output_type(ret: &ReturnType) -> (TokenStream, bool) {
    let ReturnType::Type(_, ty) = ret else {
        return (quote!(()), false);
    };
    if let Type::Path(p) = &**ty {
        if let Some(last) = p.path.segments.last() {
            if last.ident == "Result" {
                if let PathArguments::AngleBracketed(a) = &last.arguments {
                    if let Some(GenericArgument::Type(t)) = a.args.first() {
                        return (quote!(#t), true);
                    }
                }
            }
        }
    }
    (quote!(#ty), false)
}
